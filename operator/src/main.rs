mod gateway;

fn main() {}
