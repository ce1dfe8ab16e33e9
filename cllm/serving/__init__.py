"""The serving half: an OpenAI-compatible server on Ray Serve, in layers that each run and test alone.

    request    the request record (prompt ids, max tokens, sampling, stop, timings, status, committed tokens)
               and the domain errors that refuse one (`RequestError`, naming the parameter at fault)
    scheduler  admission (the fit check, done once), the waiting queue, and each step's plan: who leaves,
               who joins, whether a pass runs (prefill first), and the token budget per row, as data
    runner     the model runner: the running rows, their KV cache and its mask as one object
               (`RunningCache`), prefill and Jacobi passes over them
    engine     the continuous engine: step = schedule -> run -> commit; returns what each request gained
    static     the static engine: whole batches through the mode's offline decoder; the same interface
    output     the output processor: tokens -> text deltas, stop sequences, outside the step
    bridge     the engine in a thread of its own; `generate(requests)` / `abort(requests)` for the event loop
    protocol   the OpenAI wire format (pydantic schemas, SSE framing, `OpenAIError`)
    config     `ServeOptions` / `ServeConfig`, Ray-free (the pipeline reads them without Ray Serve)
    api        the Ray Serve deployment: routes, metrics, SSE, domain errors -> OpenAI errors, health and
               drain, `build_app`, `stop_serving`

One streamed chat request, from HTTP to its first token:
  1. api        `POST /v1/chat/completions`: the body is read (413 past `max_request_bytes`), parsed and
                checked (`protocol.parse_request`, `reject_unsupported`); the chat template renders the
                messages and the tokenizer turns them into prompt ids
  2. api        one `request.Request` per choice (`choice_sampling`: choice i samples with seed + i)
  3. bridge     `AsyncEngine.generate(choices)` registers the choices' `OutputStream` and adds them to the
                engine; admission (`scheduler.admit`) refuses a request that cannot fit with a
                `RequestError`, which the api answers as a 400 before any stream starts
  4. bridge     the engine thread, woken, runs `EngineLoop.step()`, which calls `Engine.step()`:
  5. scheduler  `Scheduler.schedule` plans the step: the new request joins (prefill first: no pass)
  6. runner     `ModelRunner.prefill` runs the prompt through the model in a cache of its own; its last
                logit gives the first token; `join` opens the row's first block and merges its cache rows
                into the `RunningCache`
  7. engine     the committed token goes into the request record and the step returns it as an
                `EngineOutput`
  8. output     `OutputProcessor.process` detokenises it (holding back a partial character or a possible
                stop sequence) into a `TextOutput`
  9. bridge     `OutputStream.put` hands it to the request's event loop
 10. api        the SSE generator takes it from the stream and writes `data: {...}` to the client
Each hop calls the next layer down or hands data up: no layer is re-entered and no callback crosses layers
on the way (the one callback, `AsyncEngine.on_step`, hands each step's numbers to the API's metrics).

What this package may import: the decoding core (`cllm.decoding`), `cllm.models.loading` and `cllm.config` (and
`api`, at build time, `cllm.models.teacher` to turn `builtin` into a model directory); never the reverse. Only `api`
imports Ray Serve, FastAPI or anything HTTP; importing this package imports none of its modules.
"""
