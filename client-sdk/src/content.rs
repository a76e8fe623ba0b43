//! Text features of items (genres, tags) turned into vectors on the device, for the hybrid recommender.
