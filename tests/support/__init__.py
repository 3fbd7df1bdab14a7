"""What the tests share, one concept a module (on the path as `support`: pytest's
`pythonpath = ["tests"]`, and `PYTHONPATH=tests` for the benchmarks).

- `processes`: the simulator and gateway replicas as real processes; `wait_until`.
- `stack`: the base gateway config, the session `Stack`, and `Rig`, the one factory of a
  module's private store, simulator and gateways.
- `api`: the gateway's API as a client sees it (error envelope, multipart, create/settle).
- `simulator`: the simulated upstream's control routes and its own /v1, and the headers
  the gateway may send it.
- `metrics`: a /metrics page read into samples.
- `raw_http`: an HTTP answer read off a raw socket.
"""
