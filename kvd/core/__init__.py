"""Pure core: layouts, TP planner, room state machine, staging geometry, ring allocator, config."""
