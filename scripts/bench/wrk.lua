-- wrk script for `make bench` (scripts/bench.py).  The request comes from
-- the environment, so one script serves every target:
--   BENCH_METHOD     GET (default) or POST
--   BENCH_PATH       request path (default: the URL's)
--   BENCH_BODY_FILE  file whose bytes are the POST body (msgpack is binary)
--   BENCH_CTYPE      Content-Type of the body
-- done() prints one machine-readable line (BENCH ...) that bench.py parses:
-- totals, socket errors, and latency percentiles in microseconds.
local method = os.getenv("BENCH_METHOD") or "GET"
local path = os.getenv("BENCH_PATH")
local body_file = os.getenv("BENCH_BODY_FILE")
local ctype = os.getenv("BENCH_CTYPE")

wrk.method = method
if path and path ~= "" then wrk.path = path end
if body_file and body_file ~= "" then
    local f = assert(io.open(body_file, "rb"))
    wrk.body = f:read("*a")
    f:close()
end
if ctype and ctype ~= "" then
    wrk.headers["Content-Type"] = ctype
    wrk.headers["Accept"] = ctype
end

-- No response() callback: wrk would then parse every response in Lua and
-- slow itself down; summary.errors.status already counts statuses >= 400.
function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d " ..
        "p50=%d p90=%d p99=%d max=%d\n",
        summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
        e.status, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
