"""The image classifier: a pretrained ResNet18 served online, as asynchronous jobs, and offline.

    settings.py       every setting, read once and handed down
    errors.py         what can go wrong, said once; each transport answers it in its own terms
    rules.py          who may call, and when: the API key, readiness, shutdown, overload, size limits
    service.py        what runs beside the transports: batcher, cache, job worker, body budget; classify()
    memory.py         the budget all request bodies share
    observability.py  metrics, logs, request ids
    schemas.py        the answers more than one door gives
    inference/        bytes -> pictures -> inputs -> batches -> forward pass -> outcomes; runtimes/
    jobs/             the durable job store, its worker, webhooks, migrations
    app.py            create_app(settings, runtime): the application assembled from the rooms below, its lifespan
    openapi.py        the OpenAPI document, corrected to the settings
    http/             the HTTP pieces: the gate before the body, routes, errors over HTTP, the page
    v2/               the Open Inference Protocol: shared rules, its HTTP and gRPC bindings, protos
    cli/              python -m classify, export, quantize
"""
