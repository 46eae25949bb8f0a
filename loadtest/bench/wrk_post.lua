-- wrk script for the closed-loop rows of loadtest/bench.sh: every request is the benchmark's
-- standard POST (a chat completion, ~100 prompt tokens, max_tokens 16), authorized with the
-- bench key from $TG_KEY. Each body carries its own "seed" (the run's start in µs since the
-- epoch plus a counter), like tollgate-load's --unique, so an answer cache in front of the
-- target misses every time, also in the runs after the first; the prompt is the same. Non-2xx answers are counted by wrk ("Non-2xx or 3xx responses") and fail the row.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("TG_KEY") or "")
local words = {}
for i = 1, 96 do
  words[i] = "token"
end
local head = '{"model":"gpt-4o","max_tokens":16,"messages":[{"role":"user","content":"'
  .. table.concat(words, " ") .. '"}],"seed":'
local first = os.time() * 1000000
local n = 0

request = function()
  n = n + 1
  return wrk.format(nil, nil, nil, head .. string.format("%.0f", first + n) .. "}")
end
