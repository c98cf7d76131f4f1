-- wrk script for serve_bench.py: POST one file as the raw request body.
--   wrk -s post_file.lua URL -- BODY_FILE CONTENT_TYPE
-- The file is read once per wrk thread (init runs before wrk formats its request). done()
-- prints one line, "BENCH_JSON {...}": request and error counts, the run's duration and
-- latency percentiles, all times in microseconds.

function init(args)
   local path = assert(args[1], "usage: wrk -s post_file.lua URL -- BODY_FILE CONTENT_TYPE")
   local fh = assert(io.open(path, "rb"))
   wrk.body = fh:read("*a")
   fh:close()
   wrk.method = "POST"
   wrk.headers["Content-Type"] = args[2] or "application/octet-stream"
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, ' ..
      '"err_timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f, ' ..
      '"max_us": %d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.mean, latency.max))
end
