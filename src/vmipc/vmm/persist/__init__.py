"""The VMM's data plane: a machine's RAM and state in and out through passed fds.

As Firecracker's ``persist.rs``: page streams, snapshot memory sections and raw images of
guest RAM (:mod:`.dataplane`), moved by cancellable blocking system calls
(:mod:`.transfer`) and kept sparse with the files' holes (:mod:`.extents`), and what a
snapshot file must hold to be restored (:mod:`.restorable`). Everything here is blocking
and runs in a worker thread; nothing here knows of sockets, trio or the control protocol.
"""
