"""The planner's building blocks: the real architectures on the meta device, and FLOP formulas FlopCounterMode
lacks (CPU attention). See docs/planning.md."""
