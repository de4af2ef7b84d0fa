//! Reader and writer tests on images built in memory.
