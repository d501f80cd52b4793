//! THUDM's original GLM-4 layout (`ChatGLMModel`).
