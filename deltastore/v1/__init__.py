"""Generated protobuf/gRPC code for proto/deltastore/v1 (regenerate with `make proto`)."""
