//! Integration tests: the real broker over real HTTP on 127.0.0.1:0, a real sled database in a
//! temporary directory, and a real loopback upstream (the sandbox or a fault server).

mod answers;
mod apps;
mod backends;
mod backup;
mod binary;
mod credentials;
mod decrypt;
mod deploy;
mod edge;
mod forward_auth;
mod fuzz;
mod login;
mod miniprogram;
mod nginx;
mod openapi;
mod operate;
mod readme;
mod redis;
mod reliability;
mod secrecy;
mod serve;
mod server_api;
mod session;
#[cfg(feature = "fault-injection")]
mod supervision;
mod support;
