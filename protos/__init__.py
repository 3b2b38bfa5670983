"""Wire protocol: .proto files and their generated stubs (regenerate with protos/generate.py)."""
