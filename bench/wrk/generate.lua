-- A small non-streamed generate request, as the Python client sends it.
wrk.method = "POST"
wrk.body = '{"model":"llama3.2","prompt":"Why is the sky blue?","stream":false}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json"
