-- wrk script: non-streaming text completion, max_tokens 16 (paragate bench).
--   wrk -t1 -c64 -d5s -s bench/completion.lua http://127.0.0.1:PORT/v1/completions
-- Env: PARAGATE_KEY -> "authorization: Bearer <key>" (gateway); MODEL (default fake-model).
-- No response() hook on purpose: it makes wrk run Lua per response and slows the driver.
-- wrk itself reports "Non-2xx or 3xx responses", so errors still show.
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
local key = os.getenv("PARAGATE_KEY")
if key and key ~= "" then
  wrk.headers["authorization"] = "Bearer " .. key
end
local model = os.getenv("MODEL") or "fake-model"
wrk.body = '{"model":"' .. model .. '","prompt":"Hello, my name is","max_tokens":16}'
