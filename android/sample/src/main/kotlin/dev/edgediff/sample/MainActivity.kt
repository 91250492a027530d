// The SDK in an app: load once, stream into a TextView, stop by cancelling the collecting job.
// Views are built in code so the sample is this one file.
package dev.edgediff.sample

import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import androidx.activity.ComponentActivity
import androidx.lifecycle.lifecycleScope
import dev.edgediff.EdgeDiff
import dev.edgediff.ffi.EdgeDiffException
import dev.edgediff.ffi.GenerationConfig
import java.io.File
import kotlinx.coroutines.Job
import kotlinx.coroutines.launch

class MainActivity : ComponentActivity() {
    private var engine: EdgeDiff? = null
    private var generation: Job? = null

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val prompt = EditText(this).apply { setText("Once upon a time") }
        val output = TextView(this)
        val run = Button(this).apply { text = "Generate" }
        val stop = Button(this).apply { text = "Stop" }
        setContentView(
            LinearLayout(this).apply {
                orientation = LinearLayout.VERTICAL
                setPadding(32, 32, 32, 32)
                addView(prompt)
                addView(LinearLayout(context).apply { addView(run); addView(stop) })
                addView(ScrollView(context).apply { addView(output) })
            },
        )

        // `adb push model.edm /sdcard/Android/data/dev.edgediff.sample/files/model.edm`
        val model = File(getExternalFilesDir(null), "model.edm")
        lifecycleScope.launch {
            engine = try {
                EdgeDiff.load(model.path).also { output.text = "${it.modelInfo}\n\n" }
            } catch (e: EdgeDiffException) {
                output.text = "Cannot load ${model.path}: ${e.message}"
                null
            }
        }

        run.setOnClickListener {
            val loaded = engine ?: return@setOnClickListener
            generation?.cancel()
            output.text = ""
            generation = lifecycleScope.launch {
                try {
                    val config = GenerationConfig(maxNewTokens = 256u, chat = true)
                    loaded.generate(prompt.text.toString(), config).collect { output.append(it) }
                    output.append("\n\n${loaded.stats.last}")
                } catch (e: EdgeDiffException) {
                    output.append("\n\nerror: ${e.message}")
                }
            }
        }
        // Cancelling the collector cancels the generation inside the engine.
        stop.setOnClickListener { generation?.cancel() }
    }

    override fun onDestroy() {
        generation?.cancel()
        engine?.close()
        super.onDestroy()
    }
}
