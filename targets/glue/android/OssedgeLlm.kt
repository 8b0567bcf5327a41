// A thin wrapper over ExecuTorch's LlmModule for an ossedge ExecuTorch model folder
// (model.pte, model.ptd, tokenizer.json). Needs an ExecuTorch build with the ossedge kernels.
package ai.ossedge

import java.io.File
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

class OssedgeLlm(dir: File, temperature: Float = {{TEMPERATURE}}f) : AutoCloseable {
    private val module = LlmModule(
        File(dir, "model.pte").path,
        File(dir, "tokenizer.json").path,
        temperature,
        File(dir, "model.ptd").path,
    )

    init {
        val status = module.load()
        require(status == 0) { "ExecuTorch could not load $dir (error $status)" }
    }

    /** Streams the completion of a harmony-formatted prompt to onToken; returns when done. */
    fun generate(prompt: String, maxTokens: Int = {{MAX_CONTEXT}}, onToken: (String) -> Unit) {
        module.generate(prompt, maxTokens, object : LlmCallback {
            override fun onResult(result: String) = onToken(result)
            override fun onStats(stats: String) {}
        }, false)
    }

    fun stop() = module.stop()

    override fun close() = module.resetNative()
}
