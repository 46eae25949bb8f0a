-- wrk script for the closed-loop rows of loadtest/bench.sh: every request is the benchmark's
-- standard POST (a chat completion, ~100 prompt tokens, max_tokens 16), authorized with the
-- bench key from $TG_KEY. Non-2xx answers are counted by wrk ("Non-2xx or 3xx responses") and
-- fail the row.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("TG_KEY") or "")
local words = {}
for i = 1, 96 do
  words[i] = "token"
end
wrk.body = '{"model":"gpt-4o","max_tokens":16,"messages":[{"role":"user","content":"'
  .. table.concat(words, " ") .. '"}]}'
