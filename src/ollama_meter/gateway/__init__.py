"""Policy the proxy enforces on requests per API key, as pure functions of the request bytes."""
