//! Reads token usage from streamed response bodies.
