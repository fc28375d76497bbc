"""Bytes on disk -> weights in memory: safetensors mmap reader, weight formats, expert store."""
