"""The API surfaces: the HTTP/1.1 layer, REST inference/management/metrics, gRPC, OpenAPI."""
