"""The Open Inference Protocol (KServe V2): what its bindings share, over HTTP (/v2) and gRPC."""
