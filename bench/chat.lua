-- wrk script: non-streaming chat completion, max_tokens 16 (paragate bench); the same
-- text as bench/completion.lua's prompt, as the one user message.
--   wrk -t1 -c64 -d5s -s bench/chat.lua http://127.0.0.1:PORT/v1/chat/completions
-- Env and headers as bench/completion.lua's (run from the repository root).
dofile("bench/completion.lua")
local model = os.getenv("MODEL") or "fake-model"
wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user","content":"Hello, my name is"}],'
  .. '"max_tokens":16}'
