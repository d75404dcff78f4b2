//! Ring-buffer records from the kernel, decoded into the shared event structs.
//!
//! Events say what the flow map cannot: the process behind a socket, a drop and its reason. The
//! counters themselves are read from the flow map, so a lost event (counted by the kernel) leaves
//! a record without that detail but does not falsify it.

use std::mem::size_of;

use observer_common::{DropEvent, SocketEvent};

fn decode<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>()).then(|| {
        // SAFETY: length checked; T is plain old data; the ring buffer gives no alignment
        // guarantee, hence read_unaligned.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
    })
}

pub fn socket(bytes: &[u8]) -> Option<SocketEvent> {
    decode(bytes)
}

pub fn drop(bytes: &[u8]) -> Option<DropEvent> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_buffers_are_refused() {
        assert!(drop(&[0u8; 10]).is_none());
        assert!(socket(&[0u8; size_of::<SocketEvent>() - 1]).is_none());
        let ev = socket(&[0u8; size_of::<SocketEvent>()]).expect("full size decodes");
        assert_eq!(ev.tgid, 0);
    }
}
