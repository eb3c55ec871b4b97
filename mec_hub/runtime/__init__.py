"""Where code runs: devices and precisions (``devices``), torchrun process groups (``distributed``)."""
