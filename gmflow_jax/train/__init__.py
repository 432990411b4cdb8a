"""Training (`docs/math.md` §4): optimizer and schedules, EMA, the train state and loss, the pure
step and its jit on a mesh, host-side reporting, and the one loop (`train.loop.train`)."""
