//! The C ABI: opaque handles, status codes with an error message, panics caught at the boundary. The only module with `unsafe`.
