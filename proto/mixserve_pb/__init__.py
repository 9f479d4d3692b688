"""Generated protobuf and gRPC stubs for the .proto files in proto/ (see proto/generate_stubs.py)."""
