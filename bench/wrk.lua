-- wrk script of the bench: `wrk -s bench/wrk.lua URL -- METHOD PATH KIND PREFIX`.
-- KIND "create-stream" sends a create-stream body with a unique trigger name per request
-- (PREFIX-thread-counter); KIND "plain" sends METHOD PATH without a body.
-- done() prints one line `WRK_JSON {...}` that bench/load.py parses.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

local method, path, kind, prefix
local counter = 0

function init(args)
  method = args[1] or "GET"
  path = args[2] or "/"
  kind = args[3] or "plain"
  prefix = args[4] or "w"
end

local json_headers = { ["Content-Type"] = "application/json" }

function request()
  if kind == "create-stream" then
    counter = counter + 1
    local name = string.format("%s-%d-%d", prefix, tid, counter)
    local body = string.format(
      '{"name":"%s","trigger_type":"stream","source":{"subject":"bench.s.%s","type":"stream"},'
        .. '"target":{"subject":"bench.d.%s","type":"stream"}}',
      name, name, name)
    return wrk.format(method, path, json_headers, body)
  end
  return wrk.format(method, path)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,'
      .. '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
