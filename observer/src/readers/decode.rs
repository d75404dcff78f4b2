//! Ring-buffer records from the kernel, decoded into the shared event structs.
//!
//! Events are hints that make the agent prompt (a new flow key to read, the process behind a
//! socket); the counters themselves are read from the flow
//! map, so a lost event (counted by the kernel) delays a record but does not falsify it.

use std::mem::size_of;

use observer_common::{DropEvent, FlowEvent, SocketEvent};

fn decode<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>()).then(|| {
        // SAFETY: length checked; T is plain old data; the ring buffer gives no alignment
        // guarantee, hence read_unaligned.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
    })
}

pub fn flow(bytes: &[u8]) -> Option<FlowEvent> {
    decode(bytes)
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
        assert!(flow(&[0u8; 10]).is_none());
        assert!(socket(&[0u8; size_of::<SocketEvent>() - 1]).is_none());
        let ev = flow(&[0u8; size_of::<FlowEvent>()]).expect("full size decodes");
        assert_eq!(ev.kind, 0);
    }
}
