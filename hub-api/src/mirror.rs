//! The fleet mirror (list → watch → relist).
