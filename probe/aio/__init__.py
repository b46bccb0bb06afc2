"""The asyncio shell: a session's I/O (:mod:`probe.aio.source`), the fork sink and its child
process (:mod:`probe.aio.sink`, :mod:`probe.aio.sinkproc`), the detection worker thread and hop
streams (:mod:`probe.aio.hopstream`), a whole run (:mod:`probe.aio.runner`), arrival stamping
at socket read (:mod:`probe.aio.wsstamp`) and ``probe tee`` (:mod:`probe.aio.tee`, its rules in
:mod:`probe.tee`). What they do is decided by the sans-I/O core packages;
these modules connect, sleep, send, receive, stamp and hand work to threads and processes."""
