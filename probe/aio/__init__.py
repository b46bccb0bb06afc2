"""The asyncio shell: a session's I/O (:mod:`probe.aio.source`), the fork sink and its child
process (:mod:`probe.aio.sink`, :mod:`probe.aio.sinkproc`), the detection worker thread and hop
streams (:mod:`probe.aio.hopstream`), a whole run (:mod:`probe.aio.runner`) and arrival stamping
at socket read (:mod:`probe.aio.wsstamp`). What they do is decided by the sans-I/O core packages;
these modules connect, sleep, send, receive, stamp and hand work to threads and processes."""
