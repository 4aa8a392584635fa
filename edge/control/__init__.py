"""The control cycle and what it decides with: intake of setpoints, schedules and EV
preferences, allocation, local grid functions, incapacity, telemetry (docs/dispatch.md)."""
