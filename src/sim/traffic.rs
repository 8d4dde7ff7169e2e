//! Simulated client traffic: splits virtual requests over ready pods the way routing objects say.
