"""What the edge agent, the hub and the simulators share: message schema, topics, ids, units,
device profiles (register maps) and the register codec.

Nothing in here does I/O beyond reading a TOML file; both sides import it, neither side is
imported by it.
"""
