# Sourced by the GPU-machine scripts, from the repository root: the device image has the NVIDIA
# driver but may lack the Vulkan loader, which the run carries as Debian packages in .gl/; and the
# NVIDIA ICD is named explicitly (VK_DRIVER_FILES) unless the caller already chose one.
if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && compgen -G ".gl/*.deb" >/dev/null; then
  echo "unpacking the Vulkan loader from .gl/" >&2
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [[ -z "${VK_DRIVER_FILES:-}" && -f "$NV_ICD" ]]; then
  export VK_DRIVER_FILES="$NV_ICD"
fi
