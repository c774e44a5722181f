//! fleetboard core.
