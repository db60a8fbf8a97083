-- One wrk script for every measurement, configured by environment variables:
--   BENCH_METHOD   GET (default) or POST
--   BENCH_AUTH     an Authorization header value (Basic ...), optional
--   BENCH_BODY     the form body (POST), sent as is, or the prefix of it when
--   BENCH_ITEMS    names a file of single-use values (codes, refresh tokens), one a
--                  line: each request appends the next value; the lines are dealt
--                  out to wrk's threads round-robin. Requests after a thread runs out
--                  are counted as "exhausted" (and fail), so the result says so.
-- done() prints one JSON line "BENCHJSON {...}" with counts and latency percentiles.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  local nthreads = counter
  nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
  method = os.getenv("BENCH_METHOD") or "GET"
  body = os.getenv("BENCH_BODY") or ""
  local auth = os.getenv("BENCH_AUTH")
  if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
  if method == "POST" then wrk.headers["Content-Type"] = "application/x-www-form-urlencoded" end
  items = nil
  local file = os.getenv("BENCH_ITEMS")
  if file and file ~= "" then
    items = {}
    local i = 0
    for line in io.lines(file) do
      if line ~= "" then
        if i % nthreads == id then table.insert(items, line) end
        i = i + 1
      end
    end
  end
  pos = 0
  exhausted = 0
end

function request()
  if items then
    pos = pos + 1
    local item = items[pos]
    if item == nil then
      exhausted = exhausted + 1
      item = "exhausted"
    end
    return wrk.format(method, nil, nil, body .. item)
  end
  if method == "POST" then return wrk.format(method, nil, nil, body) end
  return wrk.format(method)
end

function done(summary, latency, requests)
  local ex = 0
  for _, t in ipairs(threads) do ex = ex + (t:get("exhausted") or 0) end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, "exhausted": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout, ex,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
