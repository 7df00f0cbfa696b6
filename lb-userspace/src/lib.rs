//! The `lb` daemon and CLI as a library: the binary (`main.rs`) is its command line,
//! and the fuzz targets (`fuzz/`) drive the parser, the model and the reconciler
//! through it.

pub mod daemon;
pub mod datapath;
pub mod list;
pub mod model;
pub mod privileges;
pub mod reconcile;
pub mod source;
pub mod warnings;
