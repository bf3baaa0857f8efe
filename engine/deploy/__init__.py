"""`engine deploy`: a deployment rendered from a device config (configs/*.yaml).

The engine sections of the config (model, backend, cache, ...) are resolved through
`EngineConfig.build` and shipped to the server as its `--config` file; a `deploy:` section
(engine.deploy.options.DeployOptions) says how many copies run where. Renderers build plain
dicts that are dumped as YAML: Kubernetes (k8s.py), SkyPilot (skypilot.py), compose
(compose.py). The images they run are built from docker/Dockerfile (BACKEND picks the base).
"""
