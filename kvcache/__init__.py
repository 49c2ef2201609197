"""Moving a prefilled cache between meshes: the sequence and its prefill-layout description, the
checksummed wire format, transports (memory, file, TCP, JAX transfer), landing in a decode slot."""
