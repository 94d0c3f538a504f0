"""Storage backends behind one interface (deltastore.backend.Backend)."""
