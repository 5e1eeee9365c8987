//! Client protocols: bytes in, commands out. Pure; imports none of the other folders.

pub mod native;
