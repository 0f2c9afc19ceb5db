"""The HTTP pieces classifier.app assembles: the gate before the body, the routes, our errors over HTTP, the page."""
