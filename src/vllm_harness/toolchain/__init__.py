"""The build's tools that doctor probes and the build step drives: the compiler cache (sccache, ccache)
and the sccache-dist build farm.  Above facts, below doctor and steps."""
