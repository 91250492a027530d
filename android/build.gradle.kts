// Versions in one place; Kotlin matches android/jvm-test/pom.xml so CI compiles the wrapper with the
// compiler apps use.
plugins {
    id("com.android.library") version "8.7.3" apply false
    id("com.android.application") version "8.7.3" apply false
    id("org.jetbrains.kotlin.android") version "2.1.21" apply false
}
