# Homebrew formula for keyrelay, installing the release archives
# deploy/dist.sh builds. This is the template: its fields (in at-signs) are filled
# from dist/SHA256SUMS by deploy/homebrew/fill.py, which writes the formula
# to publish as dist/keyrelay.rb:
#
#   deploy/dist.sh
#   python3 deploy/homebrew/fill.py dist --url-base https://HOST/keyrelay/releases/v0.1.0
#
# CI (deploy/services_check.sh) fills it from the archives it built and
# checks the result: Ruby syntax, and each url/sha256 pair against SHA256SUMS
# and what the archive holds.
class Keyrelay < Formula
  desc "Local authenticating streaming proxy for hosted model endpoints"
  homepage "@HOMEPAGE@"
  version "@VERSION@"
  license "Apache-2.0"

  on_macos do
    on_arm do
      url "@URL_BASE@/keyrelay-@VERSION@-aarch64-apple-darwin.tar.gz"
      sha256 "@SHA256_aarch64-apple-darwin@"
    end
    on_intel do
      url "@URL_BASE@/keyrelay-@VERSION@-x86_64-apple-darwin.tar.gz"
      sha256 "@SHA256_x86_64-apple-darwin@"
    end
  end

  on_linux do
    on_arm do
      url "@URL_BASE@/keyrelay-@VERSION@-aarch64-unknown-linux-musl.tar.gz"
      sha256 "@SHA256_aarch64-unknown-linux-musl@"
    end
    on_intel do
      url "@URL_BASE@/keyrelay-@VERSION@-x86_64-unknown-linux-musl.tar.gz"
      sha256 "@SHA256_x86_64-unknown-linux-musl@"
    end
  end

  def install
    # The archive's one directory, keyrelay-VERSION-TARGET/, is the build root.
    bin.install "keyrelay"
    man1.install "keyrelay.1"
    bash_completion.install "completions/keyrelay.bash" => "keyrelay"
    zsh_completion.install "completions/_keyrelay"
    fish_completion.install "completions/keyrelay.fish"
  end

  def caveats
    <<~EOS
      keyrelay reads the API key from BASETEN_API_KEY (or --key-file).
      To run it at login with the key in your Keychain, see "Run it as a
      service" in #{opt_prefix}/README.md.
    EOS
  end

  test do
    assert_match version.to_s, shell_output("#{bin}/keyrelay --version")
    # Refuses to start without a key, naming the variable.
    output = shell_output("#{bin}/keyrelay --upstream https://127.0.0.1:9 2>&1", 64)
    assert_match "BASETEN_API_KEY", output
  end
end
