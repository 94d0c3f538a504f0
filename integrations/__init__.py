"""Engine integrations on top of the client and codecs: each needs its engine installed (an extra)."""
