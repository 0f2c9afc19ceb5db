"""The service's entry point: `uvicorn app:app`, or `python -m app` (HTTP on HOST:PORT, gRPC on HOST:GRPC_PORT).

The application is built by classifier.app.create_app from the environment's settings; importing this
module loads no model and imports no torch (the model loads when the application starts).
"""

from classifier.app import create_app, listening_socket, main

__all__ = ["app", "create_app", "listening_socket", "main"]

if __name__ == "__main__":
    main()
else:
    app = create_app()
