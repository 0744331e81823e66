-- generate.lua's request, each one with the next API key of the file named by $BENCH_KEYS
-- (one key a line) in "Authorization: Bearer": every request authenticated, the keys in turn.
-- The requests are formatted once, in init, so a request costs wrk a table lookup.
local body = '{"model":"llama3.2","prompt":"Why is the sky blue?","stream":false}'
local requests = {}
local count = 0
local next_one = 0

function init(args)
   for key in io.lines(os.getenv("BENCH_KEYS")) do
      count = count + 1
      requests[count] = wrk.format("POST", nil, {
         ["Content-Type"] = "application/json",
         ["Accept"] = "application/json",
         ["Authorization"] = "Bearer " .. key,
      }, body)
   end
   assert(count > 0, "no keys in $BENCH_KEYS")
end

function request()
   next_one = next_one % count + 1
   return requests[next_one]
end
